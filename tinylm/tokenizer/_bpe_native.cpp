// The BPE merge loop and an ASCII pre-tokenizer in C++ (plain CPython API, no build dependency
// beyond a C++17 compiler).
//
// count_pretokens(text, classes) -> list[str]
//   GPT-2 pre-tokenization + counting of the ASCII parts of `text`, added to a per-process
//   table; the parts containing non-ASCII characters come back as strings for the Python
//   `regex` path. `classes` is 128 bytes, one per ASCII character: 0 letter, 1 number,
//   2 whitespace, 3 other, as the `regex` module classifies them (so both paths agree).
// take_pretoken_counts() -> dict[bytes, int]
//   the table so far, emptied. (Keeping it in C++ across chunks avoids building and merging a
//   Python dict per chunk, which cost more than the tokenizing itself.)
//
// train_merges(words, counts, first_new_id, num_merges, callback) -> list[(left_id, right_id)]
//   words:        list[bytes], distinct pre-tokens; byte value b is token id b
//   counts:       list[int], how often each pre-token occurs
//   first_new_id: id of the first merged token (256 + number of special tokens)
//   num_merges:   how many merges to make at most (fewer if the pairs run out)
//   callback:     None or callable(merges_done), called every 1000 merges (progress bar)
//
// Same algorithm and results as `_merge_python` in bpe_train.py: the most frequent pair wins,
// ties go to the lexicographically greatest (bytes(left), bytes(right)); pair counts are updated
// only for the words containing the merged pair; the best pair comes from a max-heap whose stale
// entries (count changed since the push) are skipped when they reach the top.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using Pair = uint64_t;  // (left << 32) | right

inline Pair make_pair_key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }
inline uint32_t left_of(Pair p) { return uint32_t(p >> 32); }
inline uint32_t right_of(Pair p) { return uint32_t(p & 0xffffffffu); }

struct Entry {
    int64_t count;
    Pair pair;
};

struct PairHash {
    size_t operator()(Pair p) const noexcept {
        // splitmix64 finalizer: ids are small and dense, so the identity hash would cluster.
        p ^= p >> 30;
        p *= 0xbf58476d1ce4e5b9ULL;
        p ^= p >> 27;
        p *= 0x94d049bb133111ebULL;
        p ^= p >> 31;
        return size_t(p);
    }
};

class Merger {
  public:
    std::vector<std::string> tok;  // id -> bytes
    std::vector<std::vector<uint32_t>> words;
    std::vector<int64_t> freq;
    std::unordered_map<Pair, int64_t, PairHash> pair_count;
    std::unordered_map<Pair, std::vector<uint32_t>, PairHash> pair_words;
    std::vector<Entry> heap;
    std::vector<std::pair<Pair, int64_t>> changes;  // (pair, count delta) of the current merge

    // true when a has lower priority than b (std heap functions build a max-heap)
    bool lower(const Entry& a, const Entry& b) const {
        if (a.count != b.count) return a.count < b.count;
        const std::string& al = tok[left_of(a.pair)];
        const std::string& bl = tok[left_of(b.pair)];
        int c = al.compare(bl);  // char_traits<char>::compare orders bytes as unsigned
        if (c != 0) return c < 0;
        return tok[right_of(a.pair)].compare(tok[right_of(b.pair)]) < 0;
    }

    void push(Pair p, int64_t count) {
        heap.push_back({count, p});
        std::push_heap(heap.begin(), heap.end(), [this](const Entry& x, const Entry& y) { return lower(x, y); });
    }

    void pop() {
        std::pop_heap(heap.begin(), heap.end(), [this](const Entry& x, const Entry& y) { return lower(x, y); });
        heap.pop_back();
    }

    void init(uint32_t first_new_id) {
        tok.resize(first_new_id);
        for (int i = 0; i < 256; ++i) tok[i] = std::string(1, char(i));
        for (uint32_t w = 0; w < words.size(); ++w) {
            const auto& s = words[w];
            for (size_t i = 0; i + 1 < s.size(); ++i) {
                Pair p = make_pair_key(s[i], s[i + 1]);
                pair_count[p] += freq[w];
                auto& ws = pair_words[p];
                if (ws.empty() || ws.back() != w) ws.push_back(w);
            }
        }
        heap.reserve(pair_count.size() * 2);
        for (const auto& kv : pair_count) heap.push_back({kv.second, kv.first});
        std::make_heap(heap.begin(), heap.end(), [this](const Entry& x, const Entry& y) { return lower(x, y); });
    }

    // Pops stale entries; returns false when no pair is left.
    bool best(Pair* out) {
        while (!heap.empty()) {
            const Entry& top = heap.front();
            auto it = pair_count.find(top.pair);
            if (it != pair_count.end() && it->second == top.count) {
                *out = top.pair;
                pop();
                return true;
            }
            pop();
        }
        return false;
    }

    void merge(Pair best_pair, uint32_t new_id) {
        const uint32_t a = left_of(best_pair), b = right_of(best_pair);
        tok.push_back(tok[a] + tok[b]);
        pair_count.erase(best_pair);
        auto node = pair_words.extract(best_pair);
        if (node.empty()) return;
        std::vector<uint32_t> affected = std::move(node.mapped());
        // Only pairs touching a merge site change: the old pairs around each site go (-n) and
        // the new pairs containing new_id come (+n); all other pairs of the word are unchanged.
        std::vector<uint32_t> merged;
        changes.clear();
        for (uint32_t w : affected) {
            std::vector<uint32_t>& s = words[w];
            const size_t len = s.size();
            const int64_t n = freq[w];
            merged.clear();
            size_t last_site_end = 0;  // one past the previous merge site (0: none yet)
            bool found = false;
            for (size_t i = 0; i < len;) {
                if (i + 1 < len && s[i] == a && s[i + 1] == b) {
                    // left neighbour pair, unless it was already counted as the previous site's right
                    if (i > 0 && last_site_end != i) changes.push_back({make_pair_key(s[i - 1], a), -n});
                    if (i + 2 < len) changes.push_back({make_pair_key(b, s[i + 2]), -n});
                    merged.push_back(new_id);
                    i += 2;
                    last_site_end = i;
                    found = true;
                } else {
                    merged.push_back(s[i]);
                    i += 1;
                }
            }
            if (!found) continue;  // a stale listing: an earlier merge removed the pair here
            for (size_t k = 0; k + 1 < merged.size(); ++k) {
                if (merged[k] != new_id && merged[k + 1] != new_id) continue;
                const Pair p = make_pair_key(merged[k], merged[k + 1]);
                changes.push_back({p, n});
                auto& ws = pair_words[p];  // new_id is new, so this pair is new to the word
                if (ws.empty() || ws.back() != w) ws.push_back(w);
            }
            s.swap(merged);
        }
        // Apply all of this merge's changes at once, so a pair touched in many words (early
        // merges touch thousands) gets one heap entry, not one per word.
        std::sort(changes.begin(), changes.end());
        for (size_t i = 0; i < changes.size();) {
            Pair p = changes[i].first;
            int64_t d = 0;
            for (; i < changes.size() && changes[i].first == p; ++i) d += changes[i].second;
            // best_pair's own occurrences (overlaps such as "aaa") left with its erased count
            if (d == 0 || p == best_pair) continue;
            auto it = pair_count.find(p);
            int64_t c = (it == pair_count.end() ? 0 : it->second) + d;
            if (c != 0) {
                if (it == pair_count.end())
                    pair_count.emplace(p, c);
                else
                    it->second = c;
                push(p, c);
            } else if (it != pair_count.end()) {
                pair_count.erase(it);
            }
        }
    }
};

PyObject* train_merges(PyObject*, PyObject* args) {
    PyObject *words_obj, *counts_obj, *callback;
    Py_ssize_t first_new_id, num_merges;
    if (!PyArg_ParseTuple(args, "O!O!nnO", &PyList_Type, &words_obj, &PyList_Type, &counts_obj, &first_new_id,
                          &num_merges, &callback))
        return nullptr;
    const Py_ssize_t nw = PyList_GET_SIZE(words_obj);
    if (PyList_GET_SIZE(counts_obj) != nw) {
        PyErr_SetString(PyExc_ValueError, "words and counts must have the same length");
        return nullptr;
    }
    if (first_new_id < 256 || first_new_id > 0x7fffffff || num_merges < 0) {
        PyErr_SetString(PyExc_ValueError, "first_new_id must be >= 256 and num_merges >= 0");
        return nullptr;
    }
    Merger m;
    m.words.resize(nw);
    m.freq.resize(nw);
    for (Py_ssize_t i = 0; i < nw; ++i) {
        PyObject* w = PyList_GET_ITEM(words_obj, i);
        char* buf;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(w, &buf, &len) < 0) return nullptr;
        m.words[i].assign(reinterpret_cast<unsigned char*>(buf), reinterpret_cast<unsigned char*>(buf) + len);
        m.freq[i] = PyLong_AsLongLong(PyList_GET_ITEM(counts_obj, i));
        if (m.freq[i] == -1 && PyErr_Occurred()) return nullptr;
    }
    m.init(uint32_t(first_new_id));

    PyObject* result = PyList_New(0);
    if (!result) return nullptr;
    for (Py_ssize_t k = 0; k < num_merges; ++k) {
        Pair p;
        if (!m.best(&p)) break;
        m.merge(p, uint32_t(first_new_id + k));
        PyObject* item = Py_BuildValue("(II)", left_of(p), right_of(p));
        if (!item || PyList_Append(result, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(result);
            return nullptr;
        }
        Py_DECREF(item);
        if (callback != Py_None && (k + 1) % 1000 == 0) {
            PyObject* r = PyObject_CallFunction(callback, "n", k + 1);
            if (!r) {
                Py_DECREF(result);
                return nullptr;
            }
            Py_DECREF(r);
        }
    }
    return result;
}

// -- pre-tokenization ------------------------------------------------------------------------

enum : uint8_t { kLetter = 0, kNumber = 1, kSpace = 2, kOther = 3 };

std::unordered_map<std::string, int64_t> g_pretoken_counts;  // see take_pretoken_counts

// Length of the GPT-2 pre-token starting at s[i] of an all-ASCII segment s[0..n), following
// '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ alternative by alternative.
size_t pretoken_len(const unsigned char* s, size_t i, size_t n, const uint8_t* cls) {
    if (s[i] == '\'' && i + 1 < n) {
        const unsigned char c = s[i + 1];
        if (c == 's' || c == 'd' || c == 'm' || c == 't') return 2;
        if (i + 2 < n) {
            const unsigned char d = s[i + 2];
            if ((c == 'l' && d == 'l') || (c == 'v' && d == 'e') || (c == 'r' && d == 'e')) return 3;
        }
    }
    size_t j = (s[i] == ' ' && i + 1 < n && cls[s[i + 1]] != kSpace) ? i + 1 : i;
    const uint8_t k = cls[s[j]];
    if (k != kSpace) {  // a run of letters, numbers or others, with an optional leading space
        size_t e = j + 1;
        while (e < n && cls[s[e]] == k) ++e;
        return e - i;
    }
    size_t e = i + 1;
    while (e < n && cls[s[e]] == kSpace) ++e;
    if (e == n || e - i == 1) return e - i;  // \s+(?!\S) at the end, or a lone \s+
    return e - i - 1;                        // leave the last space to start the next token
}

PyObject* count_pretokens(PyObject*, PyObject* args) {
    PyObject* text;
    const char* classes;
    Py_ssize_t ncls;
    if (!PyArg_ParseTuple(args, "Uy#", &text, &classes, &ncls)) return nullptr;
    if (ncls != 128) {
        PyErr_SetString(PyExc_ValueError, "classes must be 128 bytes");
        return nullptr;
    }
    uint8_t cls[256];
    for (int c = 0; c < 256; ++c) cls[c] = c < 128 ? uint8_t(classes[c]) : kOther;
    Py_ssize_t size;
    const char* buf = PyUnicode_AsUTF8AndSize(text, &size);
    if (!buf) return nullptr;
    const auto* s = reinterpret_cast<const unsigned char*>(buf);
    const size_t n = size_t(size);

    std::unordered_map<std::string_view, int64_t> counts;  // this text's, merged below
    PyObject* rest = PyList_New(0);
    if (!rest) return nullptr;
    // Segments end between a visible ASCII character and a space/tab/newline: always a pre-token
    // boundary (see bpe_train._last_safe_cut), so each segment can be tokenized on its own.
    size_t start = 0;
    bool ascii = true;
    for (size_t i = 0; i <= n; ++i) {
        const bool cut = i == n || (i > start && s[i - 1] > ' ' && s[i - 1] < 127 &&
                                    (s[i] == ' ' || s[i] == '\t' || s[i] == '\n'));
        if (!cut) {
            ascii = ascii && s[i] < 128;
            continue;
        }
        if (i > start) {
            if (ascii) {
                for (size_t p = start; p < i;) {
                    const size_t len = pretoken_len(s + start, p - start, i - start, cls);
                    ++counts[std::string_view(buf + p, len)];
                    p += len;
                }
            } else {
                PyObject* seg = PyUnicode_DecodeUTF8(buf + start, Py_ssize_t(i - start), "strict");
                if (!seg || PyList_Append(rest, seg) < 0) {
                    Py_XDECREF(seg);
                    Py_DECREF(rest);
                    return nullptr;
                }
                Py_DECREF(seg);
            }
        }
        start = i;
        ascii = i == n || s[i] < 128;
    }
    for (const auto& kv : counts) g_pretoken_counts[std::string(kv.first)] += kv.second;
    return rest;
}

PyObject* take_pretoken_counts(PyObject*, PyObject*) {
    PyObject* dict = PyDict_New();
    if (!dict) return nullptr;
    for (const auto& kv : g_pretoken_counts) {
        PyObject* key = PyBytes_FromStringAndSize(kv.first.data(), Py_ssize_t(kv.first.size()));
        PyObject* val = PyLong_FromLongLong(kv.second);
        if (!key || !val || PyDict_SetItem(dict, key, val) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            Py_DECREF(dict);
            return nullptr;
        }
        Py_DECREF(key);
        Py_DECREF(val);
    }
    g_pretoken_counts.clear();
    return dict;
}

PyMethodDef methods[] = {
    {"train_merges", train_merges, METH_VARARGS,
     "train_merges(words, counts, first_new_id, num_merges, callback) -> list of (left_id, right_id)"},
    {"count_pretokens", count_pretokens, METH_VARARGS,
     "count_pretokens(text, classes) -> non-ASCII segments; ASCII pre-tokens are counted in C++"},
    {"take_pretoken_counts", take_pretoken_counts, METH_NOARGS,
     "take_pretoken_counts() -> dict of pre-token bytes -> count so far (and clear it)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bpe_native", "Native BPE merge loop for tinylm.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__bpe_native(void) { return PyModule_Create(&module); }
