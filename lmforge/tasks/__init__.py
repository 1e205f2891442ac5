"""Task-level data readers and evaluations (they run a model and call `lmforge.evaluate`)."""
