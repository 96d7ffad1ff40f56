"""RRS: a small input scored synchronously through the web service's request-response endpoint."""
