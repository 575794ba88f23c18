from setuptools import find_packages, setup

setup(
    name="pipeline-ddpm-custom",
    version="0.1.0",
    description="DDPM (Ho et al. 2020) for diffusers: scheduler, UNet, pipeline, accelerate training and a Gradio Space",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # diffusers 0.42.1 and accelerate need 3.11 (tests/test_packaging.py)
    packages=find_packages(include=["pipeline_ddpm_custom", "pipeline_ddpm_custom.*"]),
    install_requires=[
        "torch>=2.1",
        "diffusers==0.42.1",
        "huggingface_hub>=1.0",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "train": ["accelerate>=1.0", "datasets>=3.0", "tensorboard", "matplotlib", "torchmetrics>=1.4", "scipy"],
        "space": ["gradio>=6.0"],
        "test": ["pytest", "pytest-timeout", "gradio_client", "playwright", "accelerate>=1.0", "datasets>=3.0", "tensorboard",
                 "matplotlib", "torchmetrics>=1.4", "scipy", "gradio>=6.0"],
    },
    entry_points={"console_scripts": ["ddpm-custom=pipeline_ddpm_custom.cli:main"]},
)
