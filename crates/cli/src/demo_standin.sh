#!/bin/sh
# standin SERVICE: plays one of the seed's Windows services on Linux.
# It runs until it receives SIGTERM/SIGINT, and says so in its log.
service="${1:?usage: standin SERVICE}"
trap 'echo "standin[$service]: stopping"; exit 0' TERM INT
echo "standin[$service]: running as pid $$"
while :; do
    sleep 1 &
    wait $!
done
