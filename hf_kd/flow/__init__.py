"""The flow of one training step, below everything that computes a loss: the task of a model (tasks), the masks,
counts and shifts of a batch (align), the one pass that keeps what the signals need (capture), the model's block
list (layers) and the weights' schedules (schedules)."""
