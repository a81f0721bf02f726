"""fpnlib: Feature Pyramid Networks for Object Detection (Lin et al., CVPR 2017), rebuilt
step by step for reading, running and measuring.

Subpackages: ``data`` (embedded data set, COCO loading), ``modeling`` (the pyramid and its
detectors), ``engine`` (training, pycocotools evaluation).
"""
__version__ = "0.1.0"
