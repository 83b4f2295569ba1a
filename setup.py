from setuptools import find_packages, setup

setup(
    name="cpkernels",
    version="0.1.0",
    description="CP-decomposed Conv2d layers for PyTorch, with a fused Triton kernel",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cpkernels", "cpkernels.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch",
        "numpy",
        "tensorly>=0.10",
        "tqdm",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib", "tqdm", "scikit-learn", "onnx", "onnxruntime",
                 "onnxscript", "h5py", "scikit-image", "torch-pruning==1.6.1"],
        # the HED benchmarks: the photos (scikit-image, scikit-learn), the weights (h5py), the alternatives
        "bench": ["pytest-benchmark", "matplotlib", "scikit-learn", "scikit-image", "h5py", "onnx", "onnxruntime",
                  "onnxscript", "torch-pruning==1.6.1"],
        "export": ["onnx", "onnxruntime", "onnxscript"],
    },
    entry_points={"console_scripts": ["cpkernels=cpkernels.__main__:main"]},
)
