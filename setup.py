from glob import glob

from setuptools import find_packages, setup

package_name = "infmllm_ros"

setup(
    name=package_name,
    version="0.1.0",
    # kernels/ lives at the top level (Triton next to its torch reference) and ships as infmllm_ros.kernels.
    packages=find_packages(include=["infmllm_ros", "infmllm_ros.*"]) + ["infmllm_ros.kernels"],
    package_dir={"infmllm_ros.kernels": "kernels"},
    package_data={"infmllm_ros": ["assets/**/*"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "setuptools",
        # torch is deliberately not pinned here: a robot installs its own CUDA/Jetson build first.
        # requirements.txt pins the CPU build for development and CI.
        "torch>=2.4",
        "transformers>=5.24,<6",
        "numpy",
        "pillow",
        "pyyaml",
        "rosbags>=0.11",
        "xgrammar",
        "lm-format-enforcer",
        "av",
    ],
    extras_require={"test": ["pytest", "jsonschema"], "triton": ["triton"]},
    zip_safe=False,
    maintainer="infmllm_ros maintainers",
    maintainer_email="maintainers@infmllm-ros.dev",
    description="Continuous VLM session with a bounded Inf-MLLM KV cache for ROS 2 robots.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "infmllm_node = infmllm_ros.ros.node:main",
            "infmllm-replay = infmllm_ros.ros.replay:main",
            "infmllm-record = infmllm_ros.ros.record:main",
            "infmllm-make-bag = infmllm_ros.ros.make_bag:main",
            "infmllm-bench = infmllm_ros.bench.cli:main",
        ],
    },
)
