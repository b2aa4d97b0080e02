"""Noise processes, timestep grids and the samplers that walk them."""
