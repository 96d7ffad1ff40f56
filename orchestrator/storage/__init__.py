"""Blob storage: uploads, SAS references and result downloads, plus blob and file naming."""
