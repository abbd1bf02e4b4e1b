"""The run's optimizer: its stored state, the learning rate its next step uses, and the preconditioner."""
