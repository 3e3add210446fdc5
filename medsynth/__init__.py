"""medsynth: synthetic 3D CT and MRI volumes with paired segmentation labels."""

__version__ = "0.1.0"
