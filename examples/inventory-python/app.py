"""Stock keeping for Spillway, in Python: the apply step of spillway:pipeline.

A record is one product: {"stock": n, "price": p, "sold": m}. Two operations:

- restock: {"key": sku, "op": "restock", "quantity": n, "price": p?} adds n units
  (and sets the unit price, if given).
- order: {"key": sku, "op": "order", "quantity": n, "max_price": p?} takes n units,
  or is rejected when fewer are in stock or the price is above max_price.

Every write is checked here; intake only knows the operation names.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.apply import Outcome_Applied, Outcome_Rejected

MAX_QUANTITY = 1_000_000


def quantity(write, name="quantity"):
    n = write.get(name)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_QUANTITY:
        raise ValueError(f"{name} must be an integer from 1 to {MAX_QUANTITY}")
    return n


def price(write, name):
    p = write.get(name)
    if p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, (int, float)) or p < 0:
        raise ValueError(f"{name} must be a number from 0")
    return p


def step(product, write):
    """The product after one write, or ValueError with why it is rejected."""
    op = write.get("op")
    extra = set(write) - {"key", "op", "if_version", "quantity", "price", "max_price"}
    if extra:
        raise ValueError(f"unknown member {sorted(extra)[0]!r}")
    if op == "restock":
        n = quantity(write)
        new_price = price(write, "price")
        product = dict(product or {"stock": 0, "price": None, "sold": 0})
        product["stock"] += n
        if new_price is not None:
            product["price"] = new_price
        return product
    if op == "order":
        n = quantity(write)
        limit = price(write, "max_price")
        if product is None or product["stock"] < n:
            have = 0 if product is None else product["stock"]
            raise ValueError(f"only {have} in stock, {n} ordered")
        if limit is not None and (product["price"] is None or product["price"] > limit):
            raise ValueError(f"the price {product['price']} is above max_price {limit}")
        product = dict(product)
        product["stock"] -= n
        product["sold"] += n
        return product
    raise ValueError(f"unknown op {op!r}")


class Apply(exports.Apply):
    def operations(self):
        return ["restock", "order"]

    def apply(self, key, current, writes, now_ms):
        try:
            product = None if current.value is None else json.loads(current.value)
        except ValueError as e:
            raise Err(f"the stored value of {key!r} is not JSON: {e}")
        version = current.version
        outcomes = []
        for w in writes:
            try:
                write = json.loads(w.payload)
                if write.get("key") != key:
                    raise ValueError(f"write {w.id} is for another key")
                expected = write.get("if_version")
                if expected is not None and expected != version:
                    raise ValueError(f"precondition failed: the record is at version {version}, not {expected}")
                product = step(product, write)
            except ValueError as e:
                outcomes.append(Outcome_Rejected(str(e)))
                continue
            version += 1
            outcomes.append(Outcome_Applied(json.dumps(product, sort_keys=True, separators=(",", ":"))))
        return outcomes
