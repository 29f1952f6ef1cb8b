"""Where profiles come from, and finding one: the profile files of a folder, ``extends`` between
them, the user's folder over the built-ins, and lookup by name or number.

The built-ins are in ``profiles/`` at the repository root; the user folder
(``~/.config/wan-studio/profiles`` unless another is given) holds profiles that replace built-ins
of the same name, and may extend the very built-in they replace (``extends`` naming its own name).
Lookup (:meth:`ProfileSet.get`) takes a name (case-insensitive), a number (``4`` or ``"4"``) or
``"auto"``. The schema of one profile is :mod:`wan.optim.profiles`.
"""

import dataclasses
import difflib
from collections.abc import Iterator
from pathlib import Path

from wan.config import merge, read_yaml, validate
from wan.optim.profiles import IDENTITY_KEYS, Profile, ProfileError, build_profile

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_DIR = REPO_ROOT / "profiles"
DEFAULT_USER_DIR = Path("~/.config/wan-studio/profiles").expanduser()



@dataclasses.dataclass
class _Entry:
    own: Profile       # the file alone, checked; its identity keys are the profile's
    settings: dict     # the file's raw settings (identity keys left out), merged along extends
    file: str
    shadowed: "_Entry | None" = None  # the built-in a user profile of the same name replaces


def _read_file(path: Path) -> _Entry:
    raw = read_yaml(path, ProfileError)
    own = validate(Profile, raw, str(path), ProfileError)
    name = own.name or path.stem
    if not name.strip() or name.strip().isdigit():
        raise ProfileError.bad(str(path), "name", name, "a non-empty name that is not a number")
    settings = {k: v for k, v in raw.items() if k not in IDENTITY_KEYS}
    return _Entry(dataclasses.replace(own, name=name.strip()), settings, str(path))


def _read_folder(folder: Path) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        entry = _read_file(path)
        key = entry.own.name.lower()
        if key in entries:
            raise ProfileError(f"{path}: name: {entry.own.name!r} is already used by {entries[key].file}; "
                               f"expected a name unique within {folder}")
        entries[key] = entry
    return entries


class ProfileSet:
    """The profiles of one load, found by name (case-insensitive), number or ``"auto"``."""

    def __init__(self, profiles: list[Profile]):
        self._by_name = {p.name.lower(): p for p in profiles}
        self._by_number = {p.number: p for p in profiles if p.number is not None}

    def get(self, key: str | int) -> Profile:
        """``4``, ``"4"``, ``"LowRAM_LowVRAM"``, ``"lowram_lowvram"`` and ``"auto"`` all work."""
        if isinstance(key, int) and not isinstance(key, bool):
            if key in self._by_number:
                return self._by_number[key]
        elif isinstance(key, str):
            text = key.strip()
            if text.isdigit() and int(text) in self._by_number:
                return self._by_number[int(text)]
            if text.lower() in self._by_name:
                return self._by_name[text.lower()]
        known = ", ".join(p.label for p in self)
        close = difflib.get_close_matches(str(key).lower(), list(self._by_name), n=1)
        hint = f" Did you mean {self._by_name[close[0]].name}?" if close else ""
        raise ProfileError(f"unknown profile {key!r}.{hint} Known profiles: {known}")

    def names(self) -> list[str]:
        return [p.name for p in self]

    def __iter__(self) -> Iterator[Profile]:
        """Numbered profiles by number, then ``auto``, then the others by name."""
        return iter(sorted(self._by_name.values(),
                           key=lambda p: (p.number is None, p.number or 0, not p.is_auto, p.name.lower())))

    def __contains__(self, key: object) -> bool:
        try:
            self.get(key)  # type: ignore[arg-type]
            return True
        except ProfileError:
            return False

    def __len__(self) -> int:
        return len(self._by_name)


def _resolve(entries: dict[str, _Entry]) -> list[Profile]:
    """Applies ``extends`` (by name or number, over the final set) and builds the profiles."""
    by_number = {e.own.number: e for e in entries.values() if e.own.number is not None}
    done: dict[int, dict] = {}  # id(entry) -> merged settings

    def parent_of(entry: _Entry) -> _Entry | None:
        ref = entry.own.extends
        if ref is None:
            return None
        if ref.lower() == entry.own.name.lower() and entry.shadowed is not None:
            return entry.shadowed  # a user profile extending the built-in it replaces
        found = by_number.get(int(ref)) if ref.isdigit() else entries.get(ref.lower())
        if found is None:
            known = ", ".join(sorted(e.own.name for e in entries.values()))
            raise ProfileError(f"{entry.file}: extends: {ref!r} names no profile; expected one of: {known} "
                               f"(or a number {', '.join(str(n) for n in sorted(by_number))})")
        return found

    def merged(entry: _Entry, chain: tuple[_Entry, ...]) -> dict:
        if id(entry) in done:
            return done[id(entry)]
        if any(e is entry for e in chain):
            path = " -> ".join(f"{e.own.name} ({e.file})" for e in (*chain, entry))
            raise ProfileError(f"{chain[-1].file}: extends: {chain[-1].own.extends!r} makes a cycle: {path}; "
                               f"expected a chain that ends at a profile without extends")
        parent = parent_of(entry)
        data = merge(merged(parent, (*chain, entry)), entry.settings) if parent else entry.settings
        done[id(entry)] = data
        return data

    return [build_profile({**merged(entry, ()), **{k: getattr(entry.own, k) for k in IDENTITY_KEYS}}, entry.file, entry.file)
            for entry in entries.values()]


def load_profiles(user_dir: str | Path | None = DEFAULT_USER_DIR,
                  builtin_dir: str | Path | None = BUILTIN_DIR) -> ProfileSet:
    """Reads the built-in profiles, then the user folder, whose profiles replace built-ins by name.

    Args:
        user_dir: folder of the user's profiles; the default one may be absent, a folder passed
            explicitly must exist. None reads the built-ins only.
        builtin_dir: folder of the built-ins (None: no built-ins, for tests).
    """
    entries: dict[str, _Entry] = {}
    if builtin_dir is not None:
        entries.update(_read_folder(Path(builtin_dir)))
    if user_dir is not None:
        folder = Path(user_dir).expanduser()
        if folder.is_dir():
            for key, entry in _read_folder(folder).items():
                old = entry.shadowed = entries.get(key)
                if old is not None:  # a replacement keeps the number and words it omits
                    own = entry.own
                    entry.own = dataclasses.replace(own, description=own.description or old.own.description,
                                                    number=old.own.number if own.number is None else own.number)
                entries[key] = entry
        elif Path(user_dir) != DEFAULT_USER_DIR:
            raise ProfileError(f"profile folder {folder}: no such folder")
    numbers: dict[int, _Entry] = {}
    for entry in entries.values():
        n = entry.own.number
        if n is not None and n in numbers:
            raise ProfileError(f"{entry.file}: number: {n} is already used by {numbers[n].file}; "
                               f"expected a number no other profile has (or remove it)")
        if n is not None:
            numbers[n] = entry
    return ProfileSet(_resolve(entries))


def get_profile(key: str | int, user_dir: str | Path | None = DEFAULT_USER_DIR) -> Profile:
    """One profile by name, number or ``"auto"`` (see :meth:`ProfileSet.get`)."""
    return load_profiles(user_dir).get(key)
