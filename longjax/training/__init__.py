"""Training: state, optimizer, losses, the pure steps, checkpoints and the loop."""
