"""The networks: DiT/SiT, UNet and the VAE decoder, and the blocks they share."""
