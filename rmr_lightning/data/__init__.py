"""Data-side contract: the batch types models and datamodules exchange; the DK84 anatomy, connectome and their files."""
