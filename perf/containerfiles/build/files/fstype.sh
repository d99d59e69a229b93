# Appends the filesystem type of / (the RUN step's mount) to /opt/perf/fstypes.
grep ' / / ' /proc/self/mountinfo | sed 's/.* - //' | cut -d' ' -f1 >> /opt/perf/fstypes
