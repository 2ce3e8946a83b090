"""Language codes at the boundary: checked against the standard library's locale table."""

import locale
import re

_LANGUAGE_CODE = re.compile(r"([a-z]{2,3})(?:_([a-z]{2}|\d{3}))?(@[a-z]+)?")


def check_language(name: str, code: str) -> str:
    """Validates a language code and returns it normalised.

    A code is `LANGUAGE[_REGION][@MODIFIER]` (as in locale directory names: `ro`, `pt_BR`,
    `sr@latin`) whose two- or three-letter language part is known to the standard library
    (`locale.locale_alias`). Normalised means language and modifier lowercase and region
    uppercase, so that `"RO"` becomes `"ro"` and `"pt_br"` the directory name `"pt_BR"`.

    Args:
        name: str. The argument's name, used in the error message.
        code: str. The language code to check.

    Returns:
        The normalised code.

    Raises:
        TypeError: if `code` is not a str.
        ValueError: if `code` is empty or not a known language code.

    Example:
        >>> check_language("target_lang", "RO")
        'ro'
    """
    if not isinstance(code, str):
        raise TypeError(f"{name} must be a str, got {type(code).__name__}: {code!r}.")
    match = _LANGUAGE_CODE.fullmatch(code.strip().lower())
    if match is None or match.group(1) not in locale.locale_alias:
        raise ValueError(
            f"{name} {code!r} is not a known language code; expected an ISO 639 code such "
            "as 'en' or 'ro'."
        )
    language, region, modifier = match.groups()
    return language + (f"_{region.upper()}" if region else "") + (modifier or "")
