"""brainlatent: generative models of 3D brain MRI with full experiment tracking."""

__version__ = "0.1.0"
