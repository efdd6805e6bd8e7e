/* LD_PRELOAD shim: refuse to map a usbfs device node, as the kernel does once a mapping
 * would pass /sys/module/usbcore/parameters/usbfs_memory_mb (ENOMEM), or as a kernel
 * without usbfs mmap support does. Every other mmap goes through. Used for board B in
 * two_boards.sh, so that the bridge's fallback (IN transfers into the ring) runs
 * against a real device. Built by test_guest_two_boards.py on the host. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
    char link[64], target[256];
    ssize_t n;

    if (real_mmap == NULL)
        real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
    if (fd >= 0) {
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        n = readlink(link, target, sizeof target - 1);
        if (n > 0) {
            target[n] = '\0';
            if (strncmp(target, "/dev/bus/usb/", 13) == 0) {
                errno = ENOMEM;
                return MAP_FAILED;
            }
        }
    }
    return real_mmap(addr, length, prot, flags, fd, offset);
}
