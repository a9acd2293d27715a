# The whole book in one sitting, step 2 (chapter 6): the pretrained model becomes a spam classifier.
# All weights train (a model this small needs them all); texts are cut at 256 bytes.
#   python finetune_classify.py config/book_classify.py --data=$DATA/SMSSpamCollection
init_from = 'out-book/pretrain'
out_dir = 'out-book/classify'
trainable = 'all'
learning_rate = 1e-3
num_epochs = 3
max_length = 256
eval_interval = 100
