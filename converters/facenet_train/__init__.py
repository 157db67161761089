"""facenet_train: the training stack of facenet-edge (TensorFlow/Keras, the ``train`` extra).

Importing the package is cheap: TensorFlow loads only with the modules that need it
(``models``, ``flops``, ``losses``); ``lfw`` and ``metrics`` need only numpy (and matplotlib to plot).
"""
