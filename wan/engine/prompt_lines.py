"""Prompt lines with inline options, as musubi-tuner writes them in prompt files:

    a fox in snow --w 832 --h 480 --f 33 --d 42 --s 30 --g 5 --fs 3 --n blurry --i img.png

Each option sets one request field (:data:`INLINE_OPTIONS`); the value takes the field's type.
``wgp.py generate --from_file`` / ``--interactive`` and the sample prompts of training
(``wgp.py train --sample_prompts``) read lines with these functions.
"""

from __future__ import annotations

from pathlib import Path

from wan.engine.request import REQUEST_FIELDS, GenerationRequest, RequestError

# Inline options of prompt-file lines: option -> request field (the value's type is the field's).
INLINE_OPTIONS = {
    "w": "width", "h": "height", "f": "frames", "d": "seed", "s": "steps", "g": "guidance", "l": "guidance",
    "fs": "shift", "n": "negative_prompt", "i": "image", "ei": "end_image", "cn": "control_video",
}


def parse_prompt_line(line: str, base: GenerationRequest) -> GenerationRequest:
    """``prompt text --w 832 --h 480 ...`` -> ``base`` with the prompt and those fields replaced. A
    line of options alone (``--w 64``) has no prompt: it is refused, not run with the options as text."""
    parts = (" " + line.strip()).split(" --")
    changes: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        option, _, value = part.strip().partition(" ")
        if option not in INLINE_OPTIONS:
            raise RequestError(f"--{option}", value, f"inline options are: {', '.join('--' + o for o in INLINE_OPTIONS)}")
        field = INLINE_OPTIONS[option]
        kind = REQUEST_FIELDS[field].type
        try:
            changes[field] = kind(value.strip())
        except ValueError:
            raise RequestError(f"--{option}", value, f"a {kind.__name__} value for {field}") from None
    if not changes["prompt"]:
        raise RequestError("prompt", "", "a prompt before the inline options")
    return base.replace(**changes)


def read_prompt_file(path: str, flag: str = "from_file") -> list[tuple[int, str]]:
    """(line number, text) of every prompt line; blank lines and # comments are skipped. An unreadable
    file is a :class:`RequestError` on ``flag`` (the option that named the file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(flag, path, f"a readable UTF-8 text file ({e})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]
