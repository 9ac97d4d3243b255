#!/usr/bin/env python3
"""A small ticket sale against a running api, to give the dashboard something to show.

Users arrive over `--duration` seconds, queue for one schedule, and once admitted hold a random
free seat (trying another when it is taken); `--pay` of them pay, the others walk away and their
hold expires. Standard library only.

    python3 docs/dashboard/sale.py --api http://127.0.0.1:8080 --admin-token demo-admin-token
"""
import argparse
import json
import random
import threading
import time
import urllib.error
import urllib.request
import uuid


def call(base, method, path, body=None, token=None, headers=None):
    req = urllib.request.Request(base + path, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(req, data, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def buyer(args, schedule, n, stats, lock):
    base = args.api
    s, u = call(base, "POST", "/v1/users", {"name": f"fan-{n}"})
    if s != 201:
        return
    tok = u["token"]
    call(base, "POST", "/v1/users/me/points/charges", {"amount": 100_000}, tok, {"Idempotency-Key": str(uuid.uuid4())})
    s, q = call(base, "POST", "/v1/queue/tokens", {"scheduleId": schedule}, tok)
    if s != 201:
        return
    qt = q["queueToken"]
    deadline = time.time() + args.duration + 120
    while time.time() < deadline:
        s, st = call(base, "GET", "/v1/queue/tokens/me", token=tok, headers={"X-Queue-Token": qt})
        if s == 200 and st.get("status") == "ACTIVE":
            break
        time.sleep(0.5)
    else:
        return
    for _attempt in range(4):
        s, seats = call(base, "GET", f"/v1/schedules/{schedule}/seats")
        free = [x["seatId"] for x in seats["items"] if x["status"] == "AVAILABLE"]
        if not free:
            with lock:
                stats["sold_out"] += 1
            return
        # Fans like the same good seats: pick among the first few, so some holds collide.
        seat = random.choice(free[: max(3, len(free) // 5)])
        s, r = call(base, "POST", "/v1/reservations", {"seatId": seat}, tok, {"X-Queue-Token": qt})
        if s == 201:
            time.sleep(random.uniform(0.5, 3))
            if random.random() < args.pay:
                s, _ = call(base, "POST", "/v1/payments", {"reservationId": r["reservationId"]}, tok, {"Idempotency-Key": str(uuid.uuid4())})
                with lock:
                    stats["paid" if s == 201 else "pay_failed"] += 1
            else:
                with lock:
                    stats["abandoned"] += 1
            return
        with lock:
            stats["collisions"] += 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", default="http://127.0.0.1:8080")
    p.add_argument("--admin-token", default="demo-admin-token")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--seats", type=int, default=200)
    p.add_argument("--pay", type=float, default=0.6, help="share of holders who pay")
    p.add_argument("--duration", type=float, default=180, help="seconds over which users arrive")
    p.add_argument("--schedule", help="reuse this schedule instead of creating a concert")
    args = p.parse_args()
    schedule = args.schedule
    if not schedule:
        body = {"title": "Demo sale", "schedules": [{"startsAt": "2030-01-01T19:00:00Z", "bookingOpensAt": "2020-01-01T00:00:00Z",
                                                       "seatCount": args.seats, "price": 1000}]}
        s, c = call(args.api, "POST", "/v1/admin/concerts", body, args.admin_token)
        assert s == 201, (s, c)
        schedule = c["schedules"][0]["scheduleId"]
    print("schedule", schedule, flush=True)
    stats = {"paid": 0, "pay_failed": 0, "abandoned": 0, "collisions": 0, "sold_out": 0}
    lock = threading.Lock()
    threads = []
    for n in range(args.users):
        t = threading.Thread(target=buyer, args=(args, schedule, n, stats, lock), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(args.duration / args.users)
    for t in threads:
        t.join()
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
