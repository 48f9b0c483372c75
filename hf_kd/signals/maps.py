"""The layer maps and module pairs the signals take, parsed from config strings ('0:0,4:1', 'teacher.m:student.m')
or lists; DistillationConfig validates its fields with them."""

from __future__ import annotations


def parse_module_pairs(value, what: str = "module pairs") -> list[tuple[str, str]] | None:
    """'teacher.module:student.module,...' -> [(teacher name, student name), ...]."""
    if not value:
        return None
    if not isinstance(value, str):
        return [tuple(p) for p in value]
    pairs = [tuple(item.split(":")) for item in value.replace(" ", "").split(",") if item]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise ValueError(f"{what} {value!r}: expected 'teacher.module:student.module' pairs separated by commas")
    return pairs


def parse_layer_map(value, unique: bool = True) -> list[tuple[int, int]] | None:
    """'0:0,4:1,8:2' (teacher:student hidden-state indices) or a list of pairs -> list of int pairs."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            pairs = [tuple(int(x) for x in item.split(":")) for item in value.replace(" ", "").split(",") if item]
        except ValueError:
            raise ValueError(f"layer_map {value!r}: expected 'teacher:student' pairs such as '0:0,4:1,8:2'") from None
    else:
        pairs = [tuple(int(x) for x in p) for p in value]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"layer_map {value!r}: every item must be a teacher:student pair")
    students = [s for _, s in pairs]
    if unique and len(set(students)) != len(students):
        raise ValueError(f"layer_map {value!r}: a student hidden state appears twice; map each at most once")
    if any(i < 0 for p in pairs for i in p):
        raise ValueError(f"layer_map {value!r}: indices must be >= 0 (0 is the embedding output)")
    return pairs
