"""bootchain: reproducible OS images with a measured-boot chain of trust."""

__version__ = "0.1.0"
