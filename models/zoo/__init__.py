"""The small trained models shipped as defaults, and the recipe that trained them."""
