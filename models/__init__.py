"""What a trained model is and how it is evaluated: backbones, processes, samplers, checkpoints."""
