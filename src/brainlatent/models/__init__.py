"""Model families (ae, vae, gan, stylegan) and shared 3D primitives."""
