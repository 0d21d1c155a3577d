"""A small residual CNN for RGB images, registered with hpo as the model family ``resnet_small``."""
