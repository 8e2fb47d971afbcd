"""Training loops, losses and checkpoints shared by every family."""
