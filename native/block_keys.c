/* Prefix-cache block keys (kvpager.prefix_cache) in C, for kvpager._native.
 *
 * A full block's key is BLAKE2b (RFC 7693) with a 16-byte digest, no key, no
 * salt or personalisation, over its parent's key (16 bytes) followed by its
 * block_size token ids as little-endian int64: what
 * ``hashlib.blake2b(parent + tokens, digest_size=16).digest()`` gives. The first
 * block's parent is the root key (a 16-byte digest of the salt, computed in
 * Python), each later block's parent the key before it.
 *
 * prefix_cache.chain_keys' hashlib loop is the reference; tests compare the two.
 * One call hashes a whole chain (a 1M-token prompt's 62,500 blocks) where the
 * loop paid a few Python-level calls a block.
 *
 * Every message is a whole number of 64-bit words (2 of parent, block_size of
 * tokens), so the message blocks are filled word by word: a token's word is its
 * int64 value, which is what loading its little-endian bytes gives on any host.
 *
 * The arguments are checked before anything is read: a bytes-like parent of 16
 * bytes, tokens a 1-d C-contiguous buffer of signed 8-byte integers in native
 * byte order (a NumPy int64 array or a memoryview cast to 'q'), block_size >= 1,
 * max_blocks >= 0. A long chain is hashed with the GIL released (the tokens'
 * buffer held, the keys into memory of our own), a short one without: giving
 * the GIL away costs the caller up to a switch interval to take it back. */
#include "block_keys.h"

#include <stdint.h>
#include <string.h>

#include "buffers.h"

#define KEY_BYTES 16
/* Hash with the GIL released from this many bytes of tokens on (about a quarter
 * of a millisecond of hashing). */
#define RELEASE_FROM ((Py_ssize_t)1 << 18)

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

#define ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))

/* RFC 7693's mixing function G on state words a, b, c, d with message words x, y. */
#define G(a, b, c, d, x, y)          \
    do {                             \
        a = a + b + (x);             \
        d = ROTR64(d ^ a, 32);       \
        c = c + d;                   \
        b = ROTR64(b ^ c, 24);       \
        a = a + b + (y);             \
        d = ROTR64(d ^ a, 16);       \
        c = c + d;                   \
        b = ROTR64(b ^ c, 63);       \
    } while (0)

/* One round: G on the columns, then on the diagonals, with round r's message permutation. */
#define ROUND(r)                                                    \
    do {                                                            \
        G(v0, v4, v8, v12, m[SIGMA[r][0]], m[SIGMA[r][1]]);         \
        G(v1, v5, v9, v13, m[SIGMA[r][2]], m[SIGMA[r][3]]);         \
        G(v2, v6, v10, v14, m[SIGMA[r][4]], m[SIGMA[r][5]]);        \
        G(v3, v7, v11, v15, m[SIGMA[r][6]], m[SIGMA[r][7]]);        \
        G(v0, v5, v10, v15, m[SIGMA[r][8]], m[SIGMA[r][9]]);        \
        G(v1, v6, v11, v12, m[SIGMA[r][10]], m[SIGMA[r][11]]);      \
        G(v2, v7, v8, v13, m[SIGMA[r][12]], m[SIGMA[r][13]]);       \
        G(v3, v4, v9, v14, m[SIGMA[r][14]], m[SIGMA[r][15]]);       \
    } while (0)

/* RFC 7693's compression function F: ``h`` updated with the message block
 * ``m``, ``t`` bytes of the message hashed so far (this block's included; the
 * counter's high word is 0: a key's message is far below 2**64 bytes). The
 * rounds are written out, so every message index is a constant (at -O2 a loop
 * over the rounds, reading the permutation from memory, took 1.25x as long). */
static void compress(uint64_t h[8], const uint64_t m[16], uint64_t t, int last) {
    uint64_t v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
    uint64_t v8 = IV[0], v9 = IV[1], v10 = IV[2], v11 = IV[3], v12 = IV[4] ^ t, v13 = IV[5];
    uint64_t v14 = last ? ~IV[6] : IV[6], v15 = IV[7];
    ROUND(0);
    ROUND(1);
    ROUND(2);
    ROUND(3);
    ROUND(4);
    ROUND(5);
    ROUND(6);
    ROUND(7);
    ROUND(8);
    ROUND(9);
    ROUND(10);
    ROUND(11);
    h[0] ^= v0 ^ v8;
    h[1] ^= v1 ^ v9;
    h[2] ^= v2 ^ v10;
    h[3] ^= v3 ^ v11;
    h[4] ^= v4 ^ v12;
    h[5] ^= v5 ^ v13;
    h[6] ^= v6 ^ v14;
    h[7] ^= v7 ^ v15;
}

/* ``n`` words of tokens (from unaligned memory: any buffer) into ``m`` at
 * ``at``, the rest of the message block zero (the last block's padding). */
static inline void fill(uint64_t m[16], int at, const unsigned char *tokens, size_t n) {
    memcpy(m + at, tokens, n * 8);
    memset(m + at + n, 0, (16 - at - n) * 8);
}

/* The key (its first two state words, the digest as little-endian words) of
 * one block: parent words p[0], p[1], then ``bs`` tokens. */
static void block_key(uint64_t key[2], const uint64_t p[2], const unsigned char *tokens, size_t bs) {
    uint64_t h[8], m[16];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000u ^ KEY_BYTES; /* parameter block: digest length, no key, fanout and depth 1 */
    const size_t words = bs + 2;     /* the message's 64-bit words */
    size_t take = words < 16 ? words : 16, done = take;
    m[0] = p[0];
    m[1] = p[1];
    fill(m, 2, tokens, take - 2);
    tokens += (take - 2) * 8;
    while (done < words) { /* a full block with more after it: the last block is compressed as last */
        compress(h, m, (uint64_t)done * 8, 0);
        take = words - done < 16 ? words - done : 16;
        fill(m, 0, tokens, take);
        tokens += take * 8;
        done += take;
    }
    compress(h, m, (uint64_t)done * 8, 1);
    key[0] = h[0];
    key[1] = h[1];
}

static inline uint64_t load64(const unsigned char *b) {
    uint64_t w = 0;
    for (int i = 7; i >= 0; i--) {
        w = (w << 8) | b[i];
    }
    return w;
}

static inline void store64(unsigned char *b, uint64_t w) {
    for (int i = 0; i < 8; i++) {
        b[i] = (unsigned char)(w >> (8 * i));
    }
}

/* ``count`` chained keys into ``out`` (16 bytes each). */
static void chain(unsigned char *out, const unsigned char *parent, const unsigned char *tokens, size_t bs,
                  Py_ssize_t count) {
    uint64_t p[2] = {load64(parent), load64(parent + 8)};
    for (Py_ssize_t i = 0; i < count; i++) {
        block_key(p, p, tokens + (size_t)i * bs * 8, bs);
        store64(out + i * KEY_BYTES, p[0]);
        store64(out + i * KEY_BYTES + 8, p[1]);
    }
}

/* Whether a buffer format names a signed 8-byte integer in native byte order. */
static int native_int64(const char *format) {
    if (format == NULL) {
        return 0;
    }
    const uint16_t probe = 1;
    const int little = *(const unsigned char *)&probe == 1;
    char order = format[0];
    if (order == '@') {
        return (format[1] == 'q' || (format[1] == 'l' && sizeof(long) == 8)) && format[2] == '\0';
    }
    if (order == '=' || (order == '<' && little) || ((order == '>' || order == '!') && !little)) {
        return format[1] == 'q' && format[2] == '\0';
    }
    return (order == 'q' || (order == 'l' && sizeof(long) == 8)) && format[1] == '\0';
}

PyObject *kvpager_chain_keys(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_parent, *o_tokens;
    Py_ssize_t bs, max_blocks;
    if (!PyArg_ParseTuple(args, "OOnn", &o_parent, &o_tokens, &bs, &max_blocks)) {
        return NULL;
    }
    if (bs < 1) {
        PyErr_Format(PyExc_ValueError, "chain_keys: block_size must be at least 1, got %zd", bs);
        return NULL;
    }
    if (max_blocks < 0) {
        PyErr_Format(PyExc_ValueError, "chain_keys: max_blocks must not be negative, got %zd", max_blocks);
        return NULL;
    }
    unsigned char parent[KEY_BYTES];
    Py_buffer pview;
    if (PyObject_GetBuffer(o_parent, &pview, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    Py_ssize_t plen = pview.len;
    if (plen == KEY_BYTES) {
        memcpy(parent, pview.buf, KEY_BYTES);
    }
    PyBuffer_Release(&pview);
    if (plen != KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "chain_keys: parent must be a %d-byte key, got %zd bytes", KEY_BYTES, plen);
        return NULL;
    }
    Buf tokens = {0};
    if (get(o_tokens, &tokens, 1, 8, 0, "chain_keys: tokens") < 0) {
        return NULL;
    }
    if (!native_int64(tokens.view.format)) {
        PyErr_Format(PyExc_TypeError, "chain_keys: tokens must be int64 in native byte order, got format '%s'",
                     tokens.view.format ? tokens.view.format : "?");
        release(&tokens);
        return NULL;
    }
    Py_ssize_t count = tokens.view.shape[0] / bs;
    if (count > max_blocks) {
        count = max_blocks;
    }
    PyObject *keys = NULL;
    unsigned char *out = PyMem_Malloc(count ? (size_t)count * KEY_BYTES : 1);
    if (out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const unsigned char *src = tokens.view.buf;
    if (count * bs * 8 >= RELEASE_FROM) {
        Py_BEGIN_ALLOW_THREADS chain(out, parent, src, (size_t)bs, count);
        Py_END_ALLOW_THREADS
    } else {
        chain(out, parent, src, (size_t)bs, count);
    }
    keys = PyList_New(count);
    if (keys == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = PyBytes_FromStringAndSize((const char *)out + i * KEY_BYTES, KEY_BYTES);
        if (key == NULL) {
            Py_CLEAR(keys);
            goto done;
        }
        PyList_SET_ITEM(keys, i, key);
    }
done:
    PyMem_Free(out);
    release(&tokens);
    return keys;
}
