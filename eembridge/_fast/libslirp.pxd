# Declarations of libslirp 4.7 (QEMU's user-mode network stack), <slirp/libslirp.h>;
# only what eembridge/_fast/slirp.pyx uses. The include path has the header's own
# directory (pkg-config's Cflags for slirp), hence "libslirp.h".
from libc.stdint cimport uint8_t, uint32_t, int64_t


cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        uint32_t s_addr

    cdef struct in6_addr:
        uint8_t s6_addr[16]

    cdef struct sockaddr_in:
        pass

    cdef struct sockaddr_in6:
        pass


cdef extern from "libslirp.h" nogil:
    ctypedef struct Slirp:
        pass

    enum:
        SLIRP_POLL_IN
        SLIRP_POLL_OUT
        SLIRP_POLL_PRI
        SLIRP_POLL_ERR
        SLIRP_POLL_HUP

    ctypedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque) noexcept nogil
    ctypedef void (*SlirpTimerCb)(void *opaque) noexcept nogil
    ctypedef int (*SlirpAddPollCb)(int fd, int events, void *opaque) noexcept nogil
    ctypedef int (*SlirpGetREventsCb)(int idx, void *opaque) noexcept nogil

    ctypedef enum SlirpTimerId:
        SLIRP_TIMER_RA
        SLIRP_TIMER_NUM

    ctypedef struct SlirpCb:
        SlirpWriteCb send_packet
        void (*guest_error)(const char *msg, void *opaque) noexcept nogil
        int64_t (*clock_get_ns)(void *opaque) noexcept nogil
        void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque) noexcept nogil
        void (*timer_free)(void *timer, void *opaque) noexcept nogil
        void (*timer_mod)(void *timer, int64_t expire_time, void *opaque) noexcept nogil
        void (*register_poll_fd)(int fd, void *opaque) noexcept nogil
        void (*unregister_poll_fd)(int fd, void *opaque) noexcept nogil
        void (*notify)(void *opaque) noexcept nogil
        void (*init_completed)(Slirp *slirp, void *opaque) noexcept nogil
        void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque) noexcept nogil

    ctypedef struct SlirpConfig:
        uint32_t version
        int restricted
        bint in_enabled
        in_addr vnetwork
        in_addr vnetmask
        in_addr vhost
        bint in6_enabled
        in6_addr vprefix_addr6
        uint8_t vprefix_len
        in6_addr vhost6
        const char *vhostname
        const char *tftp_server_name
        const char *tftp_path
        const char *bootfile
        in_addr vdhcp_start
        in_addr vnameserver
        in6_addr vnameserver6
        const char **vdnssearch
        const char *vdomainname
        size_t if_mtu
        size_t if_mru
        bint disable_host_loopback
        bint enable_emu
        sockaddr_in *outbound_addr
        sockaddr_in6 *outbound_addr6
        bint disable_dns
        bint disable_dhcp

    Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque)
    void slirp_cleanup(Slirp *slirp)
    void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll,
                            void *opaque)
    void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents,
                            void *opaque)
    void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len)
    void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque)
    int slirp_add_hostfwd(Slirp *slirp, int is_udp, in_addr host_addr, int host_port,
                          in_addr guest_addr, int guest_port)
    const char *slirp_version_string()
