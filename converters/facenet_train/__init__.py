"""facenet_train: the training stack of facenet-edge (TensorFlow/Keras, the ``train`` extra).

Importing the package is cheap: TensorFlow loads only with the modules that need it
(``models``, ``losses``, ``flops``, ``checkpoint`` and those built on them); ``lfw``,
``metrics``, ``evaluation``, ``verify`` and ``conversion`` load without it. The module
map is in docs/architecture.md.
"""
