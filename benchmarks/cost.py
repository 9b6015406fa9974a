"""What a measured rate costs: images per hour and the price of 1,000 images for a machine billed by
the hour (`--price-per-hour`, for example an 8xA100 cloud machine at 24 USD an hour), so that an
operator compares settings in money. The rate is what the benchmark measured on the machine it ran
on; the price is the machine the operator pays for, and the two must be the same machine to mean
anything."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    images_per_hour: float
    price_per_hour: float | None = None  # in the operator's currency
    per_1000_images: float | None = None

    def line(self) -> str:
        text = f"{self.images_per_hour:,.0f} images/hour"
        if self.per_1000_images is not None:
            text += f", {self.per_1000_images:,.2f} per 1,000 images at {self.price_per_hour:g}/hour"
        return text


def check_price(price_per_hour: float | None) -> float | None:
    from kiln.errors import KilnError

    if price_per_hour is not None and not (math.isfinite(price_per_hour) and price_per_hour > 0):
        raise KilnError(f"--price-per-hour {price_per_hour} is invalid: expected a positive number (the machine's "
                        "hourly price, e.g. 24 for an 8xA100 at 24 USD an hour)")
    return price_per_hour


def cost(images_per_second: float, price_per_hour: float | None = None) -> Cost:
    """`images_per_second` as measured (0 when nothing completed: no price per image then)."""
    per_hour = max(images_per_second, 0.0) * 3600
    price = check_price(price_per_hour)
    per_1000 = price / per_hour * 1000 if price is not None and per_hour > 0 else None
    return Cost(per_hour, price, per_1000)
