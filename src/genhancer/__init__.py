"""genhancer: post-train CLIP-family vision encoders with a lightweight generative denoiser (GenHancer)."""

__version__ = "0.1.0"
