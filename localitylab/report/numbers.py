"""Numbers printed to the digits their interval needs.

A value and its 95% interval are printed with the fewest significant figures (at least
three) at which the printed value, low and high end differ wherever the numbers themselves
differ: 1.00251 [1.00242, 1.00260] prints as "1.0025 [1.0024, 1.0026]", never "1 [1, 1]".
"""

from __future__ import annotations

import math

MIN_DIGITS, MAX_DIGITS = 3, 10


def _g(number: float, digits: int, zeros: bool = True) -> str:
    if number == 0:
        return "0"
    if abs(number) < 1000:  # beside an interval trailing zeros stay: 0.700 beside 0.766, so the digits line up
        return f"{number:#.{digits}g}".rstrip(".") if zeros else f"{number:.{digits}g}"
    whole = len(f"{abs(number):.0f}")  # large numbers keep every integer digit, with separators
    return f"{number:,.{max(digits - whole, 0)}f}"


def digits_needed(*numbers: float | None, least: int = MIN_DIGITS) -> int:
    """Significant figures at which every two different finite numbers print differently."""
    finite = [float(n) for n in numbers if n is not None and math.isfinite(float(n))]
    for digits in range(least, MAX_DIGITS + 1):
        if all(_g(a, digits) != _g(b, digits) for i, a in enumerate(finite) for b in finite[i + 1:] if a != b):
            return digits
    return MAX_DIGITS


def fmt_number(number: float, digits: int = MIN_DIGITS) -> str:
    """A number on its own (a threshold, a cap): no trailing zeros."""
    return _g(float(number), digits, zeros=False)


def fmt_interval(value: float, low: float | None, high: float | None, sep: str = ", ") -> tuple[str, str]:
    """(value text, interval text '[low, high]' or '') at the digits the three need together."""
    digits = digits_needed(value, low, high)
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return fmt_number(value, digits), ""
    return _g(value, digits), f"[{_g(low, digits)}{sep}{_g(high, digits)}]"
