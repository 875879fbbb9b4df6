"""Finds where a serialized protobuf message holds invalid UTF-8 in a string field.

Python protobuf refuses such a message outright ("Error parsing message"), which would reach the
caller as an anonymous INTERNAL error. Walking the wire format lets the service answer
INVALID_ARGUMENT naming the field instead.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def find_invalid_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Path of the first string field (e.g. "chat.messages[1].content") that is not UTF-8, or
    None. Raises ValueError when the bytes are not a well-formed message at all."""
    counts: dict[str, int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _LEN:
            length, pos = _varint(data, pos)
            payload, pos = data[pos : pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = counts.get(field.name, 0)
            counts[field.name] = index + 1
            name = prefix + field.name
            if field.is_repeated:
                name += f"[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = find_invalid_utf8(field.message_type, payload, name + ".")
                if found:
                    return found
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return None
