"""Exception types. Every message names the file or value at fault."""


class FacenetEdgeError(Exception):
    """Base class for errors the runtime reports to users."""


class ModelError(FacenetEdgeError):
    """A model file is missing, truncated, not TFLite, or not an image -> embedding model."""


class ImageError(FacenetEdgeError):
    """An image cannot be read or is unusable (empty, not an image, too small, too large)."""


class NoFaceError(FacenetEdgeError):
    """No face was found where one was required."""


class MultipleFacesError(FacenetEdgeError):
    """Several faces were found where exactly one was required (enrolment)."""


class PoorPhotoError(ImageError):
    """A face too poor to enrol (small, blurred, turned away, another face beside it)."""


class CardError(FacenetEdgeError, ValueError):
    """A model card is missing, unreadable or inconsistent. Also a ValueError (what it was
    before it joined this hierarchy), so code catching that still does."""


class GalleryError(FacenetEdgeError):
    """A gallery file is missing, unreadable, or an operation on it is invalid."""


class IncompatibleModelError(GalleryError):
    """Embeddings from one model were compared with a gallery built by another, incompatible model."""
