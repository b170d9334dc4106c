#!/usr/bin/env python3
"""Reference relay for pickupd customer notifications.

Subscribes to pickup/v1/<site>/notifications (QoS 1, persistent session under a fixed
client id, so notifications published while the relay is down are delivered when it
comes back), drops repeats by notification id, and prints each new notification as one
JSON line on stdout. With --forward URL it also POSTs each one to a KakaoTalk/SMS
gateway before acknowledging it: if the POST fails the relay exits without
acknowledging, and the broker delivers the notification again on the next start.

Needs paho-mqtt 1.6 or 2.x: `apt-get install python3-paho-mqtt` (Debian) or
`pip install paho-mqtt`.

    relay.py --host 127.0.0.1 --port 1883 --site default --client-id relay-1 \
             [--seen-file seen.txt] [--forward http://gateway/send]
"""

import argparse
import json
import os
import sys
import urllib.request

import paho.mqtt.client as mqtt

SEEN_MAX = 100_000


def log(msg):
    print(f"relay: {msg}", file=sys.stderr, flush=True)


class Seen:
    """Notification ids already handled, remembered across restarts in an optional file."""

    def __init__(self, path):
        self.path = path
        self.ids = []
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                self.ids = [line.strip() for line in f if line.strip()][-SEEN_MAX:]
        self.set = set(self.ids)

    def __contains__(self, nid):
        return nid in self.set

    def add(self, nid):
        self.ids.append(nid)
        self.set.add(nid)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(nid + "\n")
                f.flush()
                os.fsync(f.fileno())
        if len(self.ids) > SEEN_MAX:
            self.set.discard(self.ids.pop(0))


def forward(url, note):
    body = json.dumps(note, ensure_ascii=False).encode("utf-8")
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": note["id"]},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"gateway answered HTTP {resp.status}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--site", default="default")
    ap.add_argument("--client-id", default="notification-relay")
    ap.add_argument("--username")
    ap.add_argument("--password")
    ap.add_argument("--seen-file", help="remember handled ids here across restarts")
    ap.add_argument("--forward", metavar="URL", help="POST each new notification here")
    args = ap.parse_args()

    topic = f"pickup/v1/{args.site}/notifications"
    seen = Seen(args.seen_file)

    # paho 2.x wants the callback API version; 1.x does not know the argument.
    if hasattr(mqtt, "CallbackAPIVersion"):
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION1, client_id=args.client_id, clean_session=False
        )
    else:
        client = mqtt.Client(client_id=args.client_id, clean_session=False)
    if args.username:
        client.username_pw_set(args.username, args.password)
    client.reconnect_delay_set(min_delay=1, max_delay=30)

    def on_connect(c, _userdata, flags, rc):
        if rc != 0:
            log(f"connect refused: {mqtt.connack_string(rc)}")
            return
        log(f"connected (session present: {bool(flags.get('session present'))})")
        # Subscribing again is harmless and covers a broker that lost the session.
        c.subscribe(topic, qos=1)

    def on_subscribe(_c, _userdata, _mid, granted_qos):
        log(f"subscribed to {topic} (qos {granted_qos[0]})")

    def on_message(_c, _userdata, msg):
        try:
            note = json.loads(msg.payload.decode("utf-8"))
            nid = note["id"]
        except (ValueError, KeyError, TypeError) as e:
            log(f"dropping unreadable message: {e}")
            return
        if nid in seen:
            log(f"duplicate {nid} dropped")
            return
        if args.forward:
            try:
                forward(args.forward, note)
            except Exception as e:  # noqa: BLE001 - any failure means "not delivered"
                log(f"forwarding {nid} failed ({e}); exiting unacknowledged")
                os._exit(1)
        print(json.dumps(note, ensure_ascii=False), flush=True)
        seen.add(nid)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect_async(args.host, args.port, keepalive=30)
    try:
        client.loop_forever(retry_first_connection=True)
    except KeyboardInterrupt:
        client.disconnect()


if __name__ == "__main__":
    main()
