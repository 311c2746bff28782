"""adapterfmt: one exact, versioned file format and toolchain for fine-tuning adapters."""
__version__ = "0.1.0"
