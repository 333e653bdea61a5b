"""LightningDataModules: abstract graphs (stage 1), brain phantoms and user scans (stage 2)."""
