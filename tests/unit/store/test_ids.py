"""Record ids are UUIDs of version 7: unique, ascending across calls, and plain FHIR ids."""

from __future__ import annotations

import re
import time
import uuid

from hms_ach.store.ids import new_id, ordered_ids

FHIR_ID = re.compile(r"^[A-Za-z0-9\-\.]{1,64}$")


def test_a_bundles_ids_ascend_and_are_version_7() -> None:
    ids = ordered_ids(1000)
    assert ids == sorted(ids) and len(set(ids)) == 1000
    for text in ids:
        u = uuid.UUID(text)
        assert (u.version, u.variant) == (7, uuid.RFC_4122)
        assert FHIR_ID.match(text)


def test_later_ids_sort_after_earlier_ones_and_carry_the_time() -> None:
    first = new_id()
    time.sleep(0.002)
    later = ordered_ids(3)
    assert all(first < i for i in later)
    millis = uuid.UUID(later[0]).int >> 80
    assert abs(millis - time.time() * 1000) < 5000
