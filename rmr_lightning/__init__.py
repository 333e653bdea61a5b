"""rmr_lightning: Reasoning-Modulated Representations for MRI and CT as a Lightning framework."""

__version__ = "0.1.0"
