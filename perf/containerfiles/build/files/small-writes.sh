# Many small writes, as apt-get update makes them: 2,000 files of about 4 KiB in 40 directories
# (shell builtins: one write(2) each), and 32 MiB written to one file in 4 KiB writes.
set -e
block=$(printf '%04000d' 0)
mkdir /srv/data
for d in $(seq 0 39); do
    mkdir /srv/data/d$d
    for f in $(seq 0 49); do
        printf '%s/%s %s\n' "$d" "$f" "$block" > /srv/data/d$d/f$f
    done
done
dd if=/dev/zero of=/srv/data/big bs=4096 count=8192 status=none
