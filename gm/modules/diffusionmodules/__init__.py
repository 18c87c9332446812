"""Diffusion parts: the UNet (openaimodel), its helpers (util), and the denoising pipeline pieces."""
