"""Path-dependent TreeSHAP of a LightGBM model from tables computed once per model.

LightGBM's `predict(pred_contrib=True)` runs TreeSHAP (Lundberg et al. 2020) for every row and tree:
O(leaves x depth^2) per tree and row, about 0.27 ms a row for a 90-tree LambdaMART on one core here, which
made the contributions of a served request's top 10 a quarter to a third of its CPU time.

The same values come cheaper with the idea of Fast TreeSHAP v2 (Yang 2021, arXiv:2109.09847): within a
tree, a leaf's share of feature i's SHAP value depends on the row only through which of the leaf's path
features the row satisfies (every split of that feature on the path sends it the path's way). So for each
leaf and each such subset (a bit mask over the leaf's distinct path features), the shares are computed once,
here in closed form:

    with v the leaf value, r_f the product of the cover fractions (child count / parent count) of the path's
    splits on feature f, M the number of distinct path features, A the satisfied ones, B the others and
    w(s) = s! (M - s - 1)! / M!,
    i in A: phi_i = v (1 - r_i) prod_B r  sum_{S subset of A - {i}} w(|S|) prod_{A - {i} - S} r
    i in B: phi_i = -v prod_B r  sum_{S subset of A} w(|S|) prod_{A - S} r

(the Shapley values of the leaf's term v * [x satisfies S's splits] * prod_{f not in S} r_f of the path-
dependent expectation E[f(x) | x_S]); the sums over subsets are elementary symmetric polynomials of the r.
A row then costs one comparison per split, one mask per leaf and one table read per (leaf, path feature),
vectorised over the batch's rows. `tests/test_treeshap.py` checks the values against LightGBM's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusionrank.errors import DataError

# LightGBM's kZeroThreshold: a value this close to 0 counts as zero for a split whose missing type is Zero
ZERO_THRESHOLD = 1e-35
MISSING_TYPES = {"None": 0, "Zero": 1, "NaN": 2}
# a leaf's table has 2^M rows of M values: beyond this many distinct features on a path, or this many values
# in all (8 bytes each), the tables are refused and LightGBM's own TreeSHAP answers
MAX_PATH_FEATURES = 16
MAX_TABLE_VALUES = 16_000_000
# rows computed together: the intermediates take about 12 bytes per row and (leaf, path feature) pair, 120 KB
# a row for the Home Depot LambdaMART's 90 trees (10,269 pairs; its tables hold 192,890 values)
CHUNK_ROWS = 256


@dataclass
class TreeShapTables:
    """One LightGBM model's splits, leaf paths and per-leaf SHAP tables, for `contributions`.

    Leaves are held longest path first, so the d-th split of every path is one slice (`step_*[d]`)."""

    n_features: int
    split_feature: np.ndarray  # [splits] int: the feature each split reads
    threshold: np.ndarray  # [splits] float64: go left when value <= threshold
    default_left: np.ndarray  # [splits] bool: the side of a missing (or, for Zero, zero) value
    missing_type: np.ndarray  # [splits] int8, MISSING_TYPES
    step_split: list[np.ndarray]  # [depth][leaves deeper than it]: the path's split at that depth
    step_left: list[np.ndarray]  # the path goes left there
    step_bit: list[np.ndarray]  # int32: the bit of that split's feature in the leaf's mask
    full_mask: np.ndarray  # [leaves] int32: every path feature followed
    slot_leaf: np.ndarray  # [slots] int: the leaf of each (leaf, path feature)
    slot_width: np.ndarray  # [slots] int32: the leaf's number of distinct path features, M
    slot_offset: np.ndarray  # [slots] int32: offset of the leaf's table in `table`, plus the feature's bit
    table: np.ndarray  # float64: per leaf, 2^M rows (masks) of M shares
    feature_slots: np.ndarray  # [n_features, slots]: 1 where the slot's share adds to the feature
    bias: float  # the expected value: what LightGBM's last contribution column holds

    @classmethod
    def from_booster(cls, booster: Any) -> TreeShapTables:
        model = booster.dump_model()
        n_features = int(model["max_feature_idx"]) + 1
        if int(model.get("num_tree_per_iteration", 1)) != 1:
            raise DataError("tree SHAP tables: one tree per iteration only (a ranking or regression model)")
        splits: list[tuple[int, float, bool, int]] = []
        leaves: list[tuple[float, list[tuple[int, bool, float]]]] = []  # value, path (split, left, fraction)
        bias = 0.0
        for tree in model["tree_info"]:
            root = tree["tree_structure"]
            if "leaf_value" in root:  # a tree without a split: a constant, all of it bias
                bias += float(root["leaf_value"])
                continue
            stack: list[tuple[dict[str, Any], list[tuple[int, bool, float]]]] = [(root, [])]
            while stack:
                node, path = stack.pop()
                if "leaf_value" in node:
                    leaves.append((float(node["leaf_value"]), path))
                    continue
                if node.get("decision_type", "<=") != "<=":
                    raise DataError(f"tree SHAP tables: unsupported split {node.get('decision_type')!r}")
                index = len(splits)
                splits.append(
                    (
                        int(node["split_feature"]),
                        float(node["threshold"]),
                        bool(node["default_left"]),
                        MISSING_TYPES[str(node["missing_type"])],
                    )
                )
                count = float(node["internal_count"])
                for child, left in ((node["left_child"], True), (node["right_child"], False)):
                    child_count = float(
                        child["leaf_count"] if "leaf_value" in child else child["internal_count"]
                    )
                    stack.append((child, [*path, (index, left, child_count / count)]))
        leaves.sort(key=lambda leaf: -len(leaf[1]))  # stable: longest paths first
        widths = [len({splits[split][0] for split, _, _ in path}) for _, path in leaves]
        size = sum((1 << width) * width for width in widths)
        if max(widths, default=0) > MAX_PATH_FEATURES or size > MAX_TABLE_VALUES:
            raise DataError(
                f"tree SHAP tables: {size} values, paths of up to {max(widths)} features (at most "
                f"{MAX_TABLE_VALUES} and {MAX_PATH_FEATURES})"
            )

        paths: list[list[tuple[int, bool, int]]] = []  # per leaf: (split, left, bit)
        slot_leaf: list[int] = []
        slot_width: list[int] = []
        slot_offset: list[int] = []
        slot_feature: list[int] = []
        full_mask: list[int] = []
        tables: list[np.ndarray] = []
        offset = 0
        for number, (value, path) in enumerate(leaves):
            features = list(dict.fromkeys(splits[split][0] for split, _, _ in path))
            width = len(features)
            bits = {feature: bit for bit, feature in enumerate(features)}
            fractions = np.ones(width)
            for split, _, fraction in path:
                fractions[bits[splits[split][0]]] *= fraction
            paths.append([(split, left, bits[splits[split][0]]) for split, left, _ in path])
            for bit, feature in enumerate(features):
                slot_leaf.append(number)
                slot_width.append(width)
                slot_offset.append(offset + bit)
                slot_feature.append(feature)
            full_mask.append((1 << width) - 1)
            bias += value * float(np.prod(fractions))
            tables.append(_leaf_table(value, fractions).ravel())
            offset += tables[-1].size
        depth = len(paths[0]) if paths else 0
        steps = [[path[d] for path in paths if len(path) > d] for d in range(depth)]
        feature_slots = np.zeros((n_features, len(slot_feature)))
        feature_slots[slot_feature, np.arange(len(slot_feature))] = 1.0
        table = np.concatenate(tables) if tables else np.zeros(0)
        if table.size >= 2**31:
            raise DataError(f"tree SHAP tables: {table.size} values, too many for int32 offsets")
        return cls(
            n_features=n_features,
            split_feature=np.array([split[0] for split in splits], dtype=np.intp),
            threshold=np.array([split[1] for split in splits], dtype=np.float64),
            default_left=np.array([split[2] for split in splits], dtype=bool),
            missing_type=np.array([split[3] for split in splits], dtype=np.int8),
            step_split=[np.array([e[0] for e in step], dtype=np.intp) for step in steps],
            step_left=[np.array([e[1] for e in step], dtype=bool) for step in steps],
            step_bit=[np.array([1 << e[2] for e in step], dtype=np.int32) for step in steps],
            full_mask=np.array(full_mask, dtype=np.int32),
            slot_leaf=np.array(slot_leaf, dtype=np.intp),
            slot_width=np.array(slot_width, dtype=np.int32),
            slot_offset=np.array(slot_offset, dtype=np.int32),
            table=table,
            feature_slots=feature_slots,
            bias=bias,
        )

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """[rows, n_features + 1]: each feature's SHAP value, then the expected value, as LightGBM's
        `predict(features, pred_contrib=True)` gives them (to float rounding)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise DataError(f"tree SHAP: expected rows of {self.n_features} features, got shape {x.shape}")
        if len(x) > CHUNK_ROWS:  # a chunk's intermediates take rows x (leaf, path feature) values
            return np.concatenate(
                [self.contributions(x[start : start + CHUNK_ROWS]) for start in range(0, len(x), CHUNK_ROWS)]
            )
        out = np.zeros((len(x), self.n_features + 1))
        out[:, -1] = self.bias
        if not len(x) or not len(self.slot_leaf):
            return out
        # [splits or leaves or slots, rows]: each step below reads whole contiguous rows of a batch
        values = x.T[self.split_feature]
        missing = np.isnan(values)
        kind = self.missing_type[:, None]
        # LightGBM's NumericalDecision: NaN reads as 0 unless the split sends NaN its default way
        values = np.where(missing & (kind != MISSING_TYPES["NaN"]), 0.0, values)
        default = ((kind == MISSING_TYPES["Zero"]) & (np.abs(values) <= ZERO_THRESHOLD)) | (
            (kind == MISSING_TYPES["NaN"]) & missing
        )
        with np.errstate(invalid="ignore"):
            left = np.where(default, self.default_left[:, None], values <= self.threshold[:, None])
        # a leaf's mask: the bits of the path features whose every split on the path the row follows
        failed = np.zeros((len(self.full_mask), len(x)), dtype=np.int32)
        for split, goes_left, bit in zip(self.step_split, self.step_left, self.step_bit, strict=True):
            failed[: len(split)] |= (left[split] != goes_left[:, None]) * bit[:, None]
        masks = self.full_mask[:, None] & ~failed
        rows = masks[self.slot_leaf] * self.slot_width[:, None] + self.slot_offset[:, None]
        out[:, :-1] = (self.feature_slots @ self.table[rows]).T
        return out


def _leaf_table(value: float, fractions: np.ndarray) -> np.ndarray:
    """[2^M, M]: the leaf's share of each path feature's SHAP value, for each mask of satisfied features
    (bit j set: the row follows the path at every split on feature j). See the module's formula."""
    width = len(fractions)
    masks = np.arange(1 << width)
    inside = ((masks[:, None] >> np.arange(width)) & 1).astype(bool)  # [masks, M]: feature in A
    weights = np.array([math.factorial(s) * math.factorial(width - s - 1) for s in range(width)])
    weights = weights / math.factorial(width)
    outside = np.where(inside, 1.0, fractions).prod(axis=1)  # prod over B of r

    def subset_sums(members: np.ndarray) -> np.ndarray:
        """Per mask, sum over S in `members` of w(|S|) prod_{members - S} r: elementary symmetric
        polynomials e_j of the members' r (j of them left out of S), weighted by w(size - j)."""
        poly = np.zeros((len(masks), width + 1))
        poly[:, 0] = 1.0
        for j in range(width):
            grow = members[:, j]
            shifted = np.zeros_like(poly)
            shifted[:, 1:] = poly[:, :-1] * fractions[j]
            poly = np.where(grow[:, None], poly + shifted, poly)
        size = members.sum(axis=1)
        total = np.zeros(len(masks))
        for j in range(width + 1):
            s = size - j
            valid = (s >= 0) & (s < width)
            total += np.where(valid, poly[:, j] * weights[np.clip(s, 0, width - 1)], 0.0)
        return total

    table = np.empty((len(masks), width))
    everyone = subset_sums(inside)
    for i in range(width):
        others = inside.copy()
        others[:, i] = False
        gain = (1.0 - fractions[i]) * subset_sums(others)
        table[:, i] = value * outside * np.where(inside[:, i], gain, -everyone)
    return table
