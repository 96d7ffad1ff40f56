"""The Azure Machine Learning batch-endpoint backend: invoke, ARM status and cancel, datastores."""
