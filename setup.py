"""ddpm-jax: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="ddpm-jax",
    version="0.1.0",
    description="Paper-exact DDPM in JAX/Flax: training, sampling, evaluation and released-weight import.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["ddpm_jax", "ddpm_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.10",
        "tensorflow-cpu>=2.21; platform_machine == 'x86_64'",
        "tensorboard>=2.20",
        "ml-collections>=1.1",
        "clu>=0.0.12",
        "grain>=0.2.18",
        "numpy>=2.0",
        "Pillow>=10",
        "matplotlib>=3.8",  # the rate-distortion plot
        "safetensors>=0.4",
        "scikit-learn>=1.5",
        "scipy>=1.13",  # FID's matrix square root and IS's softmax
        "importlib_resources>=6",
        "absl-py>=2.1",
    ],
    extras_require={
        # torch is pinned to the CPU build that lies on the project's machines; diffusers is the peer
        # implementation every parity test runs side by side with.
        # nbclient + ipykernel execute the notebooks in CI.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.13", "torch==2.13.0", "diffusers>=0.30", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29"],
    },
)
