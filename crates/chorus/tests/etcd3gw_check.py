"""Drives chorus's HTTP/JSON gateway with Python's etcd3gw (the client OpenStack uses).

Run by tests/etcd3gw.rs: python etcd3gw_check.py HOST PORT. Exits non-zero on any failure.
"""
import sys
import threading
import time

import etcd3gw
from etcd3gw.lock import Lock

host, port = sys.argv[1], int(sys.argv[2])
client = etcd3gw.client(host=host, port=port, timeout=10)
# Auto-discovery from GET /version picks the /v3 prefix.
assert client.api_path == "/v3/", client.api_path
assert client.status()["version"] == "3.5.0"
assert len(client.members()) == 1

# put, get, prefix get, delete
assert client.put("py/a", "1")
assert client.put("py/b", "2")
assert client.put("pz", "3")
assert client.get("py/a") == [b"1"], client.get("py/a")
assert client.get("py/missing") == []
prefix = sorted(client.get_prefix("py/"), key=lambda item: item[1]["key"])
assert [(value, meta["key"]) for value, meta in prefix] == [(b"1", b"py/a"), (b"2", b"py/b")], prefix
assert client.delete("py/a")
assert not client.delete("py/a")
assert client.get("py/a") == []
assert client.create("py/new", "x") is True
assert client.create("py/new", "y") is False
assert client.replace("py/new", "x", "z") is True
assert client.get("py/new") == [b"z"]
assert client.delete_prefix("py/")
assert client.get_prefix("py/") == []

# lease grant, keys, keep-alive, expiry
lease = client.lease(ttl=5)
# never more than granted, as etcd
assert 0 < lease.ttl() <= 5, lease.ttl()
client.put("py/leased", "v", lease=lease)
assert lease.keys() == [b"py/leased"], lease.keys()
assert lease.refresh() == 5
started = time.monotonic()
while client.get("py/leased"):
    assert time.monotonic() - started < 20, "the leased key was not deleted on expiry"
    time.sleep(0.25)
print(f"lease expired {time.monotonic() - started:.1f} s after its last refresh")
assert lease.ttl() == -1
revoked = client.lease(ttl=30)
client.put("py/leased2", "v", lease=revoked)
assert revoked.revoke()
assert client.get("py/leased2") == []

# watch a key and a prefix
def collect(iterator, count, out, done):
    for event in iterator:
        out.append(event)
        if len(out) == count:
            done.set()
            return


events, prefix_events = [], []
done, prefix_done = threading.Event(), threading.Event()
key_iter, cancel = client.watch("py/w")
prefix_iter, cancel_prefix = client.watch_prefix("py/wp/")
threading.Thread(target=collect, args=(key_iter, 1, events, done), daemon=True).start()
threading.Thread(target=collect, args=(prefix_iter, 2, prefix_events, prefix_done), daemon=True).start()
time.sleep(1)
client.put("py/w", "watched")
client.put("py/wp/1", "a")
client.put("py/wq", "not in the prefix")
client.delete("py/wp/1")
assert done.wait(10), "no watch event for the key"
assert prefix_done.wait(10), f"prefix events: {prefix_events}"
assert events[0]["kv"]["key"] == b"py/w" and events[0]["kv"]["value"] == b"watched", events
assert prefix_events[0]["kv"]["key"] == b"py/wp/1" and prefix_events[0]["kv"]["value"] == b"a"
assert prefix_events[1].get("type") == "DELETE", prefix_events
cancel()
cancel_prefix()

# locks (KV txns + leases)
lock = Lock("py-lock", ttl=10, client=client)
assert lock.acquire()
assert lock.is_acquired()
other = Lock("py-lock", ttl=10, client=client)
assert not other.acquire(), "a held lock was acquired twice"
assert lock.release()
assert other.acquire()
assert other.release()
with client.lock("py-lock-2", ttl=10) as held:
    assert held.is_acquired()
print("etcd3gw: all checks passed")
