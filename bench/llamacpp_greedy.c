/* Greedy decoding in llama.cpp, token ids out: the llama.cpp side of bench/llamacpp_greedy.py.

    nanoseek-llamacpp-greedy MODEL.gguf N_PREDICT N_THREADS PROMPT [PROMPT ...]

For each prompt, one JSON line on stdout: the ids llama.cpp's own tokenizer gives the text (with BOS where the
GGUF says add_bos_token), the N_PREDICT ids greedy decoding picks, and at each step the margin of the pick over
the runner-up in llama.cpp's logits. Text tools (llama-simple, llama-cli) print pieces, which do not say which ids
were chosen; this program uses only llama.h's long-standing calls (llama_tokenize, llama_batch_get_one,
llama_decode, llama_get_logits_ith), so it builds against the pinned llama.cpp unchanged. Ties go to the lower
id, as torch.argmax does. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void errors_only(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_PREDICT N_THREADS PROMPT [PROMPT ...]\n", argv[0]);
        return 2;
    }
    const int n_predict = atoi(argv[2]), n_threads = atoi(argv[3]);
    llama_log_set(errors_only, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (model == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    /* one context for all prompts, sized for the longest; its memory is cleared between prompts */
    int longest = 0;
    for (int p = 4; p < argc; p++) {
        const int n = -llama_tokenize(vocab, argv[p], (int)strlen(argv[p]), NULL, 0, true, false);
        if (n > longest) longest = n;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (unsigned)(longest + n_predict);
    cp.n_threads = cp.n_threads_batch = n_threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) {
        fprintf(stderr, "cannot create a llama.cpp context of %d tokens\n", longest + n_predict);
        return 1;
    }
    llama_token *ids = malloc(sizeof(llama_token) * (size_t)(longest + n_predict));
    float *margins = malloc(sizeof(float) * (size_t)n_predict);
    for (int p = 4; p < argc; p++) {
        const int n = llama_tokenize(vocab, argv[p], (int)strlen(argv[p]), ids, longest, true, false);
        llama_memory_clear(llama_get_memory(ctx), true);
        struct llama_batch batch = llama_batch_get_one(ids, n);
        for (int s = 0; s < n_predict; s++) {
            if (llama_decode(ctx, batch)) {
                fprintf(stderr, "llama_decode failed at step %d of prompt %d\n", s, p - 3);
                return 1;
            }
            const float *logits = llama_get_logits_ith(ctx, -1);
            int best = 0, second = -1;
            for (int v = 1; v < n_vocab; v++) {
                if (logits[v] > logits[best]) {
                    second = best;
                    best = v;
                } else if (second < 0 || logits[v] > logits[second]) {
                    second = v;
                }
            }
            margins[s] = logits[best] - logits[second];
            ids[n + s] = best;
            batch = llama_batch_get_one(&ids[n + s], 1);
        }
        printf("{\"prompt\": [");
        for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
        printf("], \"tokens\": [");
        for (int s = 0; s < n_predict; s++) printf(s ? ", %d" : "%d", ids[n + s]);
        printf("], \"margins\": [");
        for (int s = 0; s < n_predict; s++) printf(s ? ", %.6g" : "%.6g", margins[s]);
        printf("]}\n");
        fflush(stdout);
    }
    free(margins);
    free(ids);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
