"""Local path or Hub id: whether a name that is not an existing file was meant as a local path, so that a
missing file is reported as missing instead of being looked up on the Hub (hub.py for activation banks,
data.py for corpora and tokenizers)."""
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

PATH_PREFIXES = ("/", ".", "~")


def looks_like_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """True when `name` is written like a local path or cannot be a Hub repo or dataset id: it starts with
    /, . or ~, ends with one of the file `suffixes` (a trailing .gz aside), or is not of the form "name"
    or "owner/name"."""
    if name.startswith(PATH_PREFIXES) or name.removesuffix(".gz").endswith(suffixes):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False
