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
in a loop compiled by numba (already installed with ranx). `tests/test_treeshap.py` checks the values
against LightGBM's own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusionrank.errors import DataError

# LightGBM's kZeroThreshold: a value this close to 0 counts as zero for a split whose missing type is Zero
ZERO_THRESHOLD = 1e-35
MISSING_TYPES = {"None": 0, "Zero": 1, "NaN": 2}
ZERO_MISSING, NAN_MISSING = MISSING_TYPES["Zero"], MISSING_TYPES["NaN"]
# a leaf's table has 2^M rows of M values: beyond this many distinct features on a path, or this many values
# in all (8 bytes each), the tables are refused and LightGBM's own TreeSHAP answers
MAX_PATH_FEATURES = 16
MAX_TABLE_VALUES = 16_000_000
# rows computed in one call: its decisions take a byte per split and row (2,700 splits for the Home Depot
# LambdaMART's 90 trees), so a whole evaluation split at once would take gigabytes
CHUNK_ROWS = 1024


@dataclass
class TreeShapTables:
    """One LightGBM model's splits, leaf paths and per-leaf SHAP tables, for `contributions`.

    Leaf l's path is `path_*[path_start[l]:path_start[l + 1]]`; its distinct path features are
    `slot_feature[slot_start[l]:slot_start[l + 1]]`, the j-th of them bit j of the leaf's masks; its table
    (2^M rows of M shares, M its number of distinct path features) starts at `table[table_offset[l]]`.
    """

    n_features: int
    split_feature: np.ndarray  # [splits] int64: the feature each split reads
    threshold: np.ndarray  # [splits] float64: go left when value <= threshold
    default_left: np.ndarray  # [splits] bool: the side of a missing (or, for Zero, zero) value
    missing_type: np.ndarray  # [splits] int64, MISSING_TYPES
    path_start: np.ndarray  # [leaves + 1] int64
    path_split: np.ndarray  # [path steps] int64: the split of each step of each leaf's path
    path_left: np.ndarray  # [path steps] bool: the path goes left there
    path_bit: np.ndarray  # [path steps] int64: the bit of that split's feature in the leaf's mask
    slot_start: np.ndarray  # [leaves + 1] int64
    slot_feature: np.ndarray  # [slots] int64: the leaf's distinct path features, in bit order
    table_offset: np.ndarray  # [leaves] int64
    table: np.ndarray  # float64: per leaf, 2^M rows (masks) of M shares
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
        widths = [len({splits[split][0] for split, _, _ in path}) for _, path in leaves]
        size = sum((1 << width) * width for width in widths)
        if max(widths, default=0) > MAX_PATH_FEATURES or size > MAX_TABLE_VALUES:
            raise DataError(
                f"tree SHAP tables: {size} values, paths of up to {max(widths)} features (at most "
                f"{MAX_TABLE_VALUES} and {MAX_PATH_FEATURES})"
            )

        steps: list[tuple[int, bool, int]] = []  # (split, left, bit) of every leaf's path, leaf after leaf
        path_start, slot_start, slot_feature, table_offset = [0], [0], [], []
        tables: list[np.ndarray] = []
        offset = 0
        for value, path in leaves:
            features = list(dict.fromkeys(splits[split][0] for split, _, _ in path))
            bits = {feature: bit for bit, feature in enumerate(features)}
            fractions = np.ones(len(features))
            for split, _, fraction in path:
                fractions[bits[splits[split][0]]] *= fraction
            steps.extend((split, left, 1 << bits[splits[split][0]]) for split, left, _ in path)
            path_start.append(len(steps))
            slot_feature.extend(features)
            slot_start.append(len(slot_feature))
            table_offset.append(offset)
            bias += value * float(np.prod(fractions))
            tables.append(_leaf_table(value, fractions).ravel())
            offset += tables[-1].size
        return cls(
            n_features=n_features,
            split_feature=np.array([split[0] for split in splits], dtype=np.int64),
            threshold=np.array([split[1] for split in splits], dtype=np.float64),
            default_left=np.array([split[2] for split in splits], dtype=bool),
            missing_type=np.array([split[3] for split in splits], dtype=np.int64),
            path_start=np.array(path_start, dtype=np.int64),
            path_split=np.array([step[0] for step in steps], dtype=np.int64),
            path_left=np.array([step[1] for step in steps], dtype=bool),
            path_bit=np.array([step[2] for step in steps], dtype=np.int64),
            slot_start=np.array(slot_start, dtype=np.int64),
            slot_feature=np.array(slot_feature, dtype=np.int64),
            table_offset=np.array(table_offset, dtype=np.int64),
            table=np.concatenate(tables) if tables else np.zeros(0),
            bias=bias,
        )

    def contributions(self, features: np.ndarray) -> np.ndarray:
        """[rows, n_features + 1]: each feature's SHAP value, then the expected value, as LightGBM's
        `predict(features, pred_contrib=True)` gives them (to float rounding)."""
        x = np.ascontiguousarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise DataError(f"tree SHAP: expected rows of {self.n_features} features, got shape {x.shape}")
        out = np.zeros((len(x), self.n_features + 1))
        out[:, -1] = self.bias
        for start in range(0, len(x) if len(self.slot_feature) else 0, CHUNK_ROWS):
            _kernel()(
                x[start : start + CHUNK_ROWS],
                self.split_feature,
                self.threshold,
                self.default_left,
                self.missing_type,
                self.path_start,
                self.path_split,
                self.path_left,
                self.path_bit,
                self.slot_start,
                self.slot_feature,
                self.table_offset,
                self.table,
                out[start : start + CHUNK_ROWS],
            )
        return out


def _contributions(
    x, split_feature, threshold, default_left, missing_type, path_start, path_split, path_left, path_bit,
    slot_start, slot_feature, table_offset, table, out,
):  # fmt: skip
    """Adds each row's SHAP values to `out[:, :-1]` (compiled by numba: `_kernel`).

    Leaf by leaf, all rows together: a leaf's path and table are read once per call, and the masks are
    built without branches. Row by row, with a branch per path step (taken at random), the same work took 5
    times as long: 50 rows of the Home Depot LambdaMART in 5.3 ms against 1.0 ms (LightGBM: 14.1 ms).
    """
    rows = x.shape[0]
    # each split's decision for each row, LightGBM's NumericalDecision: NaN reads as 0 unless the split
    # sends NaN its default way
    left = np.empty((len(split_feature), rows), dtype=np.uint8)
    for split in range(len(split_feature)):
        feature, kind = split_feature[split], missing_type[split]
        for row in range(rows):
            value = x[row, feature]
            missing = np.isnan(value)
            if missing and kind != NAN_MISSING:
                value = 0.0
            if (kind == ZERO_MISSING and abs(value) <= ZERO_THRESHOLD) or (kind == NAN_MISSING and missing):
                left[split, row] = default_left[split]
            else:
                left[split, row] = value <= threshold[split]
    masks = np.empty(rows, dtype=np.int64)
    for leaf in range(len(table_offset)):
        # the leaf's mask: the bits of the path features whose every split on the path the row follows
        first, width = slot_start[leaf], slot_start[leaf + 1] - slot_start[leaf]
        masks[:] = (1 << width) - 1
        for step in range(path_start[leaf], path_start[leaf + 1]):
            split, goes_left, bit = path_split[step], np.uint8(path_left[step]), path_bit[step]
            for row in range(rows):
                masks[row] &= ~(bit * (left[split, row] ^ goes_left))
        for row in range(rows):
            base = table_offset[leaf] + masks[row] * width
            for j in range(width):
                out[row, slot_feature[first + j]] += table[base + j]


@functools.cache
def _kernel():
    """`_contributions` compiled (once per process, a second or two): one call that holds the GIL only to
    enter and leave, so the server's event loop runs beside it (a pure numpy version, some 60 calls a batch,
    queued behind the event loop's Python under load: commit 365037e)."""
    import numba

    return numba.njit(nogil=True)(_contributions)


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
