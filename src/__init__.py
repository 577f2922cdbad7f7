"""OFT-Control: orthogonal finetuning for spatially controlled text-to-image diffusion."""
